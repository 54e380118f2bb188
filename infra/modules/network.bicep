// Optional network isolation (main.bicep `vnetEnabled`, off by default as in Microsoft's Flex
// Consumption samples): one virtual network with
//   app                subnet delegated to Microsoft.App/environments: VNet integration of the
//                      Flex Consumption app (all its outbound traffic goes through the VNet);
//   private-endpoints  the private endpoints of the data and host storage accounts;
// and the private DNS zones that make <account>.<service>.core.windows.net resolve to those
// endpoints inside the VNet. Layout as in Azure-Samples/functions-quickstart-python-azd-eventgrid-blob
// (infra/app/vnet.bicep, infra/app/storage-PrivateEndpoint.bicep), declared natively here.
// https://learn.microsoft.com/azure/azure-functions/flex-consumption-how-to#enable-virtual-network-integration

@description('Azure region.')
param location string

@description('Virtual network name.')
param name string

@description('Address space of the virtual network.')
param addressPrefix string = '10.0.0.0/16'

@description('Subnet of the Function App VNet integration (delegated to Microsoft.App/environments).')
param appSubnetPrefix string = '10.0.1.0/24'

@description('Subnet of the private endpoints.')
param privateEndpointSubnetPrefix string = '10.0.2.0/24'

@description('Tags for every resource.')
param tags object = {}

var storageServices = [
  'blob'
  'queue'
  'table'
]

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
      {
        name: 'private-endpoints'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          privateEndpointNetworkPolicies: 'Disabled'
        }
      }
    ]
  }
}

resource dnsZones 'Microsoft.Network/privateDnsZones@2020-06-01' = [for service in storageServices: {
  name: 'privatelink.${service}.${environment().suffixes.storage}'
  location: 'global'
  tags: tags
}]

resource dnsLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [for (service, i) in storageServices: {
  parent: dnsZones[i]
  name: '${name}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

output id string = vnet.id
output appSubnetId string = '${vnet.id}/subnets/app'
output privateEndpointSubnetId string = '${vnet.id}/subnets/private-endpoints'
output blobDnsZoneId string = dnsZones[0].id
output queueDnsZoneId string = dnsZones[1].id
output tableDnsZoneId string = dnsZones[2].id
