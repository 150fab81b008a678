import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Meta;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The HAPI FHIR JPA server (R4) on an in-memory H2 database, served by Jetty at
 * http://127.0.0.1:PORT/fhir: the EHR's FHIR server in radtriage's tests
 * (tests/support/hapi_server.py). Transactions, conditional create and update and search
 * are HAPI's own; nothing here changes their behaviour. Prints "READY <port>" on stdout
 * once it answers.
 *
 * Usage: java -cp LIBS/*:CLASSES FhirServer PORT [DATA_DIR]
 * With DATA_DIR the database is a file there, so a server stopped and started again (the
 * tests' "EHR down, then back") still has what it stored; without, it is in memory.
 */
public class FhirServer {

    @Configuration
    @Import({
        JpaR4Config.class,
        HapiJpaConfig.class,
        ThreadPoolFactoryConfig.class,
        JpaBatch2Config.class,
        Batch2JobsConfig.class,
        SubscriptionChannelConfig.class
    })
    public static class Jpa {
        static String url = "jdbc:h2:mem:fhir;DB_CLOSE_DELAY=-1";

        @Bean
        public JpaStorageSettings storageSettings() {
            JpaStorageSettings settings = new JpaStorageSettings();
            // Reports point to their patient, order and study by identifier only (the EHR's own
            // resources): logical references, stored as they are.
            settings.setAllowExternalReferences(true);
            settings.setEnforceReferentialIntegrityOnWrite(false);
            settings.setAutoCreatePlaceholderReferenceTargets(false);
            // Every search runs afresh: a test reads back what it has just stored, so a
            // search's results reused from a minute ago (HAPI's default) would miss it.
            settings.setReuseCachedSearchResultsForMillis(null);
            return settings;
        }

        @Bean
        public PartitionSettings partitionSettings() {
            return new PartitionSettings();
        }

        @Bean
        public DataSource dataSource() {
            BasicDataSource source = new BasicDataSource();
            source.setDriverClassName("org.h2.Driver");
            source.setUrl(url);
            source.setUsername("sa");
            source.setPassword("");
            source.setMaxTotal(10);
            return source;
        }

        @Bean
        @Primary
        public LocalContainerEntityManagerFactoryBean entityManagerFactory(
                ConfigurableListableBeanFactory beanFactory,
                FhirContext fhirContext,
                JpaStorageSettings storageSettings,
                DataSource dataSource) {
            LocalContainerEntityManagerFactoryBean factory =
                    HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
            factory.setPersistenceUnitName("HAPI_PU");
            factory.setDataSource(dataSource);
            Properties jpa = new Properties();
            jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
            jpa.put("hibernate.hbm2ddl.auto", "update");
            jpa.put("hibernate.format_sql", "false");
            jpa.put("hibernate.show_sql", "false");
            jpa.put("hibernate.jdbc.batch_size", "20");
            jpa.put("hibernate.cache.use_query_cache", "false");
            jpa.put("hibernate.cache.use_second_level_cache", "false");
            // No full-text index (Lucene): search by token, reference and date is the database's.
            jpa.put("hibernate.search.enabled", "false");
            factory.setJpaProperties(jpa);
            return factory;
        }

        @Bean
        @Primary
        public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
            return new JpaTransactionManager(entityManagerFactory);
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        if (args.length > 1) {
            Jpa.url = "jdbc:h2:file:" + args[1] + "/fhir";
        }
        AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(Jpa.class);

        @SuppressWarnings("unchecked")
        IFhirSystemDao<Bundle, Meta> systemDao = spring.getBean(IFhirSystemDao.class);
        RestfulServer fhir = new RestfulServer(systemDao.getContext());
        spring.getBean(DaoRegistry.class).setSupportedResourceTypes(systemDao.getContext().getResourceTypes());
        fhir.registerProviders(spring.getBean(ResourceProviderFactory.class).createProviders());
        fhir.registerProvider(spring.getBean(IJpaSystemProvider.class));
        fhir.setPagingProvider(spring.getBean(DatabaseBackedPagingProvider.class));

        Server jetty = new Server();
        ServerConnector connector = new ServerConnector(jetty);
        connector.setHost("127.0.0.1");
        connector.setPort(port);
        jetty.addConnector(connector);
        ServletContextHandler context = new ServletContextHandler();
        context.setContextPath("/");
        ServletHolder holder = new ServletHolder(fhir);
        holder.setInitOrder(1);
        context.addServlet(holder, "/fhir/*");
        jetty.setHandler(context);
        jetty.start();
        System.out.println("READY " + connector.getLocalPort());
        System.out.flush();
        jetty.join();
    }
}
